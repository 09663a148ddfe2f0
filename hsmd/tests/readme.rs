//! The README lists every audit event type and every permission; a new one
//! that it does not name fails here, so the document stays true.

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));

#[test]
fn the_readme_names_every_audit_event_type() {
    let missing: Vec<&str> = hsmd::audit::EventType::ALL
        .iter()
        .map(|e| e.as_str())
        .filter(|name| !README.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not name these event types: {missing:?}"
    );
}

#[test]
fn the_readme_permission_table_names_every_action() {
    for (resource, actions) in hsmd::auth::policy::RESOURCES.iter() {
        let row = README
            .lines()
            .find(|l| {
                l.starts_with('|')
                    && l.split('|')
                        .nth(1)
                        .is_some_and(|c| c.contains(&format!("`{resource}`")))
            })
            .unwrap_or_else(|| panic!("README.md's permission table has no row for {resource}"));
        let words: Vec<&str> = row.split('|').nth(2).unwrap_or("").split_whitespace().collect();
        for action in actions {
            assert!(
                words.contains(action),
                "README.md's row for {resource} lacks {action}: {row}"
            );
        }
    }
}
