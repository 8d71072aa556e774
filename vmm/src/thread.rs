//! The VMM's helper threads: where they run (one implementation for the
//! workspace, in `notifier::sched`) and how their death is noticed.
//!
//! One rule for every helper thread (the fault thread, the tracepoint
//! pump, the bystander, the racer): [`spawn_helper`] runs its body under a
//! guard whose `on_fail` runs when the body returns an error **or panics**
//! (the guard drops during the unwind). `on_fail` raises the flag the vCPU
//! run stops on, so a dead helper stops the run in bounded time instead of
//! leaving the guest asleep in a fault nobody serves; the join then says
//! which thread died and why ([`panic_message`]).

use std::any::Any;
use std::thread::JoinHandle;

pub use notifier::sched::pin_to_cpu;

/// Runs `on_fail` when dropped armed.
struct OnFail<G: FnOnce()>(Option<G>);

impl<G: FnOnce()> Drop for OnFail<G> {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g();
        }
    }
}

/// Spawn `body` on a thread named `name`; `on_fail` runs on that thread
/// if the body returns `Err` or panics.
pub fn spawn_helper<T, E, F, G>(
    name: &str,
    on_fail: G,
    body: F,
) -> std::io::Result<JoinHandle<Result<T, E>>>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
    G: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut guard = OnFail(Some(on_fail));
            let r = body();
            if r.is_ok() {
                guard.0 = None;
            }
            r
        })
}

/// A helper thread that panicked: which, and what it said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {thread} thread panicked: {message}")]
pub struct ThreadPanicked {
    pub thread: &'static str,
    pub message: String,
}

/// Join `handle`, the thread called `thread`; its panic becomes a
/// [`ThreadPanicked`] that says what it said.
pub fn join<T>(thread: &'static str, handle: JoinHandle<T>) -> Result<T, ThreadPanicked> {
    handle.join().map_err(|p| ThreadPanicked {
        thread,
        message: panic_message(&*p),
    })
}

/// What a panicked thread said (its `panic!` message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn run(body: impl FnOnce() -> Result<(), ()> + Send + 'static) -> (bool, Option<String>) {
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let h = spawn_helper("t", move || f.store(true, Ordering::SeqCst), body).unwrap();
        let panicked = join("t", h).err().map(|p| p.message);
        (failed.load(Ordering::SeqCst), panicked)
    }

    #[test]
    fn on_fail_runs_on_error_and_panic_only() {
        assert_eq!(run(|| Ok(())), (false, None));
        assert_eq!(run(|| Err(())), (true, None));
        let (failed, msg) = run(|| panic!("boom {}", 7));
        assert!(failed);
        assert_eq!(msg.as_deref(), Some("boom 7"));
    }
}
