//! Page-table pages come from 2 MiB chunks (512 tables each) handed out in
//! address order, so that a zap sweeping neighbouring tables streams through
//! contiguous memory (separately allocated 4 KiB-aligned pages cost twice
//! the memory with glibc and sweep about twice as slowly). Chunks are
//! obtained lazily from the global allocator (large allocations are
//! mmap-backed: untouched tables take no resident memory) and kept until
//! the pool is dropped; freed tables are recycled.

use super::{PageTable, SPTES_PER_TABLE};
use crate::spte::{LeafAttrs, Spte};
use notifier::PageSize;
use parking_lot::Mutex;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// The pfn of the leaves a freed table is filled with.
pub const POISON_PFN: u64 = crate::spte::PFN_MAX & !((1 << 18) - 1);

fn poison_spte() -> u64 {
    Spte::leaf(POISON_PFN, PageSize::Size1G, LeafAttrs::default()).map_or(0, |s| s.raw())
}

/// Tables per chunk.
pub(crate) const TABLES_PER_CHUNK: usize = 512;

fn chunk_layout() -> Layout {
    // 2 MiB, 4 KiB aligned: cannot fail.
    Layout::from_size_align(TABLES_PER_CHUNK * 4096, 4096).expect("chunk layout")
}

/// A table address that may cross threads (deferred frees run wherever the
/// epoch collector runs).
#[derive(Clone, Copy)]
pub(crate) struct TablePtr(pub(crate) NonNull<PageTable>);

// SAFETY: a TablePtr is an owning handle to a PageTable (atomics only),
// moved between threads by value; the pool serialises access to its lists.
unsafe impl Send for TablePtr {}

#[derive(Default)]
pub(crate) struct TablePool {
    free: Mutex<Vec<TablePtr>>,
    chunks: Mutex<Vec<TablePtr>>,
    chunk_count: AtomicU64,
}

impl TablePool {
    /// A zeroed (all non-present) table.
    pub(crate) fn alloc(&self) -> NonNull<PageTable> {
        let mut free = self.free.lock();
        if let Some(t) = free.pop() {
            drop(free);
            // SAFETY: tables on the free list belong to the pool, no walker
            // can reach them (freed after an epoch grace period), and
            // PageTable is plain atomics, so zeroing through a shared
            // reference is fine.
            let table = unsafe { t.0.as_ref() };
            for e in table.spte.iter() {
                e.store(0, Ordering::Relaxed);
            }
            return t.0;
        }
        let layout = chunk_layout();
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<PageTable>();
        let Some(base) = NonNull::new(base) else {
            std::alloc::handle_alloc_error(layout)
        };
        self.chunks.lock().push(TablePtr(base));
        self.chunk_count.fetch_add(1, Ordering::Relaxed);
        // Hand out in ascending address order: push the rest in reverse.
        for i in (1..TABLES_PER_CHUNK).rev() {
            // SAFETY: `i` < TABLES_PER_CHUNK, inside the chunk just allocated.
            free.push(TablePtr(unsafe { base.add(i) }));
        }
        base
    }

    /// Return a table no walker can reach any more.
    ///
    /// # Safety
    /// `table` came from [`alloc`](Self::alloc) of this pool and is not
    /// referenced by any SPTE or walker.
    pub(crate) unsafe fn release(&self, table: NonNull<PageTable>) {
        // Poison: a walker that could still reach a freed table (a broken
        // grace period) would find 1 GiB leaves of POISON_PFN, which the
        // stress test looks for. `alloc` zeroes before reuse.
        // SAFETY: per the contract nobody else references the table; it is
        // plain atomics.
        let t = unsafe { table.as_ref() };
        let poison = poison_spte();
        for e in t.spte.iter() {
            e.store(poison, Ordering::Relaxed);
        }
        self.free.lock().push(TablePtr(table));
    }

    /// Bytes of chunks obtained (virtual; resident only where touched).
    pub(crate) fn chunk_bytes(&self) -> u64 {
        self.chunk_count.load(Ordering::Relaxed) * (TABLES_PER_CHUNK * 4096) as u64
    }
}

impl Drop for TablePool {
    fn drop(&mut self) {
        for c in self.chunks.get_mut().drain(..) {
            // SAFETY: allocated in `alloc` with the same layout; the pool is
            // dropped only when the MMU and every deferred free holding it
            // are gone, so nothing references its tables.
            unsafe { std::alloc::dealloc(c.0.as_ptr().cast(), chunk_layout()) };
        }
    }
}

const _: () = assert!(std::mem::size_of::<PageTable>() == SPTES_PER_TABLE * 8);
