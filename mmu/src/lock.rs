//! `mmu_lock`: an rwlock (as on x86 KVM) that also tells a zapper whether a
//! fault is waiting for it - the user-space stand-in for
//! `rwlock_needbreak(&kvm->mmu_lock)`.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::sync::atomic::{AtomicU32, Ordering};

/// The MMU lock. Faults take it for read, invalidations for write.
#[derive(Debug, Default)]
pub struct MmuLock {
    inner: RwLock<()>,
    /// Threads blocked in `read()` / `write()` right now.
    waiters: AtomicU32,
}

pub type MmuReadGuard<'a> = RwLockReadGuard<'a, ()>;
pub type MmuWriteGuard<'a> = RwLockWriteGuard<'a, ()>;

impl MmuLock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn read(&self) -> MmuReadGuard<'_> {
        if let Some(g) = self.inner.try_read() {
            return g;
        }
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let g = self.inner.read();
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    pub fn write(&self) -> MmuWriteGuard<'_> {
        if let Some(g) = self.inner.try_write() {
            return g;
        }
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let g = self.inner.write();
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    /// Someone is blocked on the lock (`rwlock_needbreak`).
    #[inline]
    pub fn contended(&self) -> bool {
        self.waiters.load(Ordering::Relaxed) != 0
    }

    /// `cond_resched_rwlock_write`: hand the lock to whoever waits (fair
    /// unlock), let the scheduler run, take it back.
    pub fn yield_write(guard: &mut MmuWriteGuard<'_>) {
        RwLockWriteGuard::unlocked_fair(guard, std::thread::yield_now);
    }

    /// `cond_resched_rwlock_read`.
    pub fn yield_read(guard: &mut MmuReadGuard<'_>) {
        RwLockReadGuard::unlocked_fair(guard, std::thread::yield_now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn contended_sees_a_blocked_reader_and_yield_lets_it_in() {
        let lock = Arc::new(MmuLock::new());
        let mut w = lock.write();
        let l2 = lock.clone();
        let reader = std::thread::spawn(move || {
            let _r = l2.read();
        });
        let t = Instant::now();
        while !lock.contended() {
            assert!(t.elapsed() < Duration::from_secs(5), "reader never blocked");
            std::thread::yield_now();
        }
        MmuLock::yield_write(&mut w);
        drop(w);
        reader.join().unwrap();
        assert!(!lock.contended());
    }
}
