//! Asking before what cannot be undone (`key destroy`, `key purge`, `file
//! delete`): `--yes` for scripts; on a terminal, a prompt; otherwise a refusal.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use crate::failure::{Failure, Local};

/// Goes ahead if `yes`, or if a person at a terminal types `yes` when told
/// `what` will happen; refuses otherwise, saying how to go ahead.
pub(crate) fn confirm(what: &str, yes: bool) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(Local::NotConfirmed.fail(format!(
            "{what}; add --yes to go ahead (there is no terminal to ask on)"
        )));
    }
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{what}. Type yes to go ahead: ");
    let _ = err.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Local::NotConfirmed.fail(format!("cannot read the answer: {e}")))?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(Local::NotConfirmed.fail("not confirmed; nothing was done"))
    }
}
