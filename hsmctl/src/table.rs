//! hsmctl's tables: plain columns, each as wide as its widest cell, so long
//! values (`rsa-pkcs1-2048`, a user name, an RFC 3339 time) never push the
//! rest out of line.

use comfy_table::{presets::NOTHING, CellAlignment, ContentArrangement, Table};

/// Prints `rows` under `header`; the columns whose index is in `right` are
/// right-aligned (numbers).
pub(crate) fn print(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        // Never wrap: a script cutting columns sees one row per line.
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for row in rows {
        table.add_row(row);
    }
    for &i in right {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    for line in table.lines() {
        // The preset pads each cell by one space; the first and last are noise.
        println!("{}", line.strip_prefix(' ').unwrap_or(&line).trim_end());
    }
}
