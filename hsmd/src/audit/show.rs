//! `audit show`: the lines that pass a filter.

use std::{
    collections::VecDeque,
    fs::File,
    io::BufReader,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::line::{self, Piece};

/// Filters for `audit show`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events at or after this time.
    pub since: Option<SystemTime>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this user (name or uid).
    pub user: Option<String>,
    /// Only events about this key.
    pub key: Option<String>,
    /// Only `success` or `failure`.
    pub result: Option<String>,
    /// At most this many (the newest).
    pub limit: usize,
}

impl Filter {
    /// Checks the filter's values, so that a typo is an error and not an
    /// empty answer: a known event type, `success` or `failure`, and a user
    /// that exists here or a numeric uid (blocking: it asks the user database).
    ///
    /// # Errors
    /// What is wrong and which values are valid.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.event_type {
            if super::EventType::parse(e).is_none() {
                let all: Vec<&str> = super::EventType::ALL.iter().map(|t| t.as_str()).collect();
                return Err(format!(
                    "unknown event type {e:?}; the event types are {}",
                    all.join(", ")
                ));
            }
        }
        if let Some(r) = &self.result {
            if r != "success" && r != "failure" {
                return Err(format!("unknown result {r:?}; use success or failure"));
            }
        }
        if let Some(u) = &self.user {
            if u.parse::<u32>().is_err() && !matches!(nix::unistd::User::from_name(u), Ok(Some(_))) {
                return Err(format!(
                    "no user named {u:?} on this machine; give a user name that exists here, or a numeric uid"
                ));
            }
        }
        Ok(())
    }

    fn passes(&self, v: &serde_json::Value, since: Option<Duration>, key: Option<&str>) -> bool {
        if let Some(since) = since {
            let t = v["timestamp"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
            if t.is_none_or(|t| t < since) {
                return false;
            }
        }
        if self
            .event_type
            .as_deref()
            .is_some_and(|e| !v["event_type"].as_str().is_some_and(|x| x.eq_ignore_ascii_case(e)))
        {
            return false;
        }
        if let Some(u) = &self.user {
            let uid_match = v["uid"].as_u64().is_some_and(|x| x.to_string() == *u);
            if !uid_match && v["user"].as_str() != Some(u.as_str()) {
                return false;
            }
        }
        if key.is_some_and(|k| v["resource"].as_str() != Some(k)) {
            return false;
        }
        self.result.as_deref().is_none_or(|r| v["result"].as_str() == Some(r))
    }
}

/// The most bytes of lines one answer carries (answers may be up to 16 MiB).
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// The lines of `files` that pass `filter`, oldest first: the newest
/// `filter.limit`, and no more than fit in 8 MiB.
#[must_use]
pub fn show(files: &[PathBuf], filter: &Filter) -> Vec<String> {
    let since = filter
        .since
        .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO));
    let key = filter.key.as_ref().map(|k| format!("key:{k}"));
    let mut out = VecDeque::new();
    let mut total = 0usize;
    let mut buf = Vec::new();
    for path in files {
        let Ok(f) = File::open(path) else { continue };
        let mut r = BufReader::new(f);
        while let Ok(Piece::Whole { bytes, .. }) = line::read_line(&mut r, &mut buf) {
            let Some(bytes) = bytes else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            if !filter.passes(&v, since, key.as_deref()) {
                continue;
            }
            let line = String::from_utf8_lossy(&bytes).into_owned();
            total += line.len() + 8;
            out.push_back(line);
            // The newest lines that fit in one answer: a large `limit` is cut
            // to what a frame can carry, not refused.
            while out.len() > filter.limit.max(1) || (total > MAX_ANSWER_BYTES && out.len() > 1) {
                if let Some(dropped) = out.pop_front() {
                    total -= dropped.len() + 8;
                }
            }
        }
    }
    out.into()
}
