//! Test-only failure injection: make one of the VMM's threads panic or
//! fail with an error at a chosen point, to check that the VMM then stops
//! in bounded time, says which thread died and why, exits non-zero and
//! leaves the host as it found it (the fault-injection tests in
//! `tests/fault_injection.rs`).
//!
//! `HVMM_FAILPOINT=<point>=<action>[@<n>][,...]`: at the `n`th time (from
//! 1, default 1) the thread passes `point`, it does `action`:
//!
//! | point | where |
//! |---|---|
//! | `vcpu` | the vCPU thread, at a `KVM_RUN` exit ([`crate::vstate::vcpu`]) |
//! | `uffd-fault` | the userfaultfd fault thread, at a page fault it read ([`crate::memory::fault`]) |
//! | `uffd-event` | the same thread as the event reader, at a non-cooperative event (REMOVE, UNMAP, REMAP) it read, before it is delivered |
//! | `trace-pump` | the tracepoint pump thread, at each drain ([`crate::host::events::TracePump`]) |
//! | `bystander` | the bystander thread, at each concurrent operation ([`crate::host::bystander`]) |
//!
//! | action | what |
//! |---|---|
//! | `panic` | `panic!` (the thread unwinds: its guards run) |
//! | `error` | the point returns [`Injected`] as the thread's error |
//!
//! Unset, every [`hit`] is one relaxed atomic load. A spec that does not
//! parse is refused at start ([`check_env`]), never ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable read once per process.
pub const ENV: &str = "HVMM_FAILPOINT";

/// A place a thread passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Vcpu,
    UffdFault,
    UffdEvent,
    TracePump,
    Bystander,
}

const POINTS: [(Point, &str); 5] = [
    (Point::Vcpu, "vcpu"),
    (Point::UffdFault, "uffd-fault"),
    (Point::UffdEvent, "uffd-event"),
    (Point::TracePump, "trace-pump"),
    (Point::Bystander, "bystander"),
];

impl Point {
    pub fn name(self) -> &'static str {
        POINTS
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("?", |(_, n)| n)
    }

    fn index(self) -> usize {
        POINTS.iter().position(|(p, _)| *p == self).unwrap_or(0)
    }
}

/// What a point does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Panic,
    Error,
}

/// One `<point>=<action>@<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub point: Point,
    pub action: Action,
    /// Fires on this hit (1-based).
    pub nth: u64,
}

/// The error an `error` action returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("failpoint {}: injected error", .0.name())]
pub struct Injected(pub Point);

/// A spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ENV}: {0:?}: expected <point>=<panic|error>[@<n>] with point one of vcpu, uffd-fault, uffd-event, trace-pump, bystander")]
pub struct BadSpec(pub String);

/// Parse a whole spec (`,`-separated rules; empty: none).
pub fn parse(spec: &str) -> Result<Vec<Rule>, BadSpec> {
    spec.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| parse_rule(r).ok_or_else(|| BadSpec(r.to_string())))
        .collect()
}

fn parse_rule(r: &str) -> Option<Rule> {
    let (point, rest) = r.split_once('=')?;
    let (action, nth) = match rest.split_once('@') {
        Some((a, n)) => (a, n.parse::<u64>().ok().filter(|&n| n >= 1)?),
        None => (rest, 1),
    };
    let point = POINTS.iter().find(|(_, n)| *n == point)?.0;
    let action = match action {
        "panic" => Action::Panic,
        "error" => Action::Error,
        _ => return None,
    };
    Some(Rule { point, action, nth })
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        std::env::var(ENV)
            .ok()
            .and_then(|s| parse(&s).ok())
            .unwrap_or_default()
    })
}

/// At start: refuse a spec that does not parse (and say which rules are
/// armed, so a test log shows it).
pub fn check_env() -> Result<(), BadSpec> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    let armed = parse(&spec)?;
    for r in &armed {
        eprintln!(
            "vmm: failpoint armed: {} {:?} at hit {}",
            r.point.name(),
            r.action,
            r.nth
        );
    }
    Ok(())
}

static HITS: [AtomicU64; POINTS.len()] = [const { AtomicU64::new(0) }; POINTS.len()];

/// The thread passes `point`: nothing, unless a rule fires here.
pub fn hit(point: Point) -> Result<(), Injected> {
    let rules = rules();
    if rules.is_empty() {
        return Ok(());
    }
    let Some(hits) = HITS.get(point.index()) else {
        return Ok(());
    };
    let n = hits.fetch_add(1, Ordering::Relaxed) + 1;
    match rules.iter().find(|r| r.point == point && r.nth == n) {
        None => Ok(()),
        Some(r) if r.action == Action::Panic => {
            panic!("failpoint {}: injected panic (hit {n})", point.name())
        }
        Some(_) => Err(Injected(point)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(parse(""), Ok(vec![]));
        assert_eq!(
            parse("vcpu=panic, uffd-fault=error@3"),
            Ok(vec![
                Rule {
                    point: Point::Vcpu,
                    action: Action::Panic,
                    nth: 1
                },
                Rule {
                    point: Point::UffdFault,
                    action: Action::Error,
                    nth: 3
                },
            ])
        );
        for bad in [
            "vcpu",
            "vcpu=hang",
            "cpu=panic",
            "vcpu=panic@0",
            "vcpu=panic@x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for (p, n) in POINTS {
            assert_eq!(p.name(), n);
        }
    }
}
