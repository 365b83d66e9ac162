//! The write hold of a gRPC connection: its first write after a flush
//! waits until the calls ready on its thread have run, so their answers
//! share one `writev` (used by `transport::Conn`).

use std::task::{Context, Poll};

/// Write coalescing without Nagle's delay.
///
/// hyper runs every call in a task of its own; a finished call queues its
/// response frames in h2 and wakes the connection task, which (tokio runs a
/// task woken by the running one next) encodes and writes them at once. With
/// many calls in flight that is one `writev`, one TCP segment and one wake-up
/// of the client per response: a quarter of the server's CPU went to
/// `writev` and the loopback delivery under it. So the first write after a
/// flush is held back (`Pending`, the task's waker put on its worker's list
/// of deferred wake-ups, as `yield_now` does): the calls queued meanwhile
/// finish, h2 encodes their responses into its buffer, and they go out in
/// one write. The worker runs deferred wake-ups when it runs out of tasks
/// or at its next check for I/O; each finished call also wakes the
/// connection task, and every such poll counts as an attempt.
///
/// Waking the task again at once instead (it then queues behind the tasks
/// ready on its worker) gathered answers the same way but also woke the
/// runtime's idle worker to steal them, a `futex` and a context switch
/// every few answers; a client on the same machine paid for that too
/// (BENCHMARKS.md §7).
///
/// The hold ends after [`MAX_HOLD_TRIES`] write attempts (h2 tries once or
/// more per poll of the connection) or when [`MAX_HOLD_BYTES`] wait. No timer
/// is involved: a lone response waits a few passes of the scheduler,
/// microseconds, not a delayed ACK as with Nagle (`TCP_NODELAY` stays on).
/// A hold that gained nothing (one call at a time) turns holding off for
/// the next [`SKIP_AFTER_IDLE_HOLD`] writes, so a connection with one call
/// in flight rarely pays for one.
///
/// Done here by hand because neither h2 nor hyper has a "write at the end of
/// the batch" option, and TCP_CORK would need the same end-of-batch signal.
#[derive(Default)]
pub(super) struct Coalesce {
    /// The next write is the first since a flush: hold it back.
    armed: bool,
    /// A hold is in progress.
    holding: bool,
    /// Bytes offered when the hold began.
    held_len: usize,
    /// Write attempts during the hold.
    tries: u32,
    /// Batches still to write without a hold.
    skip: u32,
}

/// Write attempts a hold lasts at most.
const MAX_HOLD_TRIES: u32 = 4;
/// Bytes that end a hold (about 50 small responses; h2's write buffer is 16 KiB).
const MAX_HOLD_BYTES: usize = 8 * 1024;
/// Batches written at once after a hold that gained nothing.
const SKIP_AFTER_IDLE_HOLD: u32 = 16;

impl Coalesce {
    /// `Ready` when a write of `len` bytes may go to the socket now;
    /// `Pending` (with the task woken again) while it is held back.
    pub(super) fn poll_write_ready(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<()> {
        if self.holding {
            self.tries += 1;
            if self.tries < MAX_HOLD_TRIES && len < MAX_HOLD_BYTES {
                wake_later(cx);
                return Poll::Pending;
            }
            if len <= self.held_len {
                self.skip = SKIP_AFTER_IDLE_HOLD;
            }
            self.holding = false;
            self.armed = false;
            return Poll::Ready(());
        }
        if !self.armed || len >= MAX_HOLD_BYTES {
            return Poll::Ready(());
        }
        if self.skip > 0 {
            self.skip -= 1;
            self.armed = false;
            return Poll::Ready(());
        }
        self.holding = true;
        self.held_len = len;
        self.tries = 0;
        wake_later(cx);
        Poll::Pending
    }

    /// A flush went through: the next write starts a new batch.
    pub(super) fn flushed(&mut self) {
        self.armed = true;
    }
}

/// Wakes the task once its worker has run the tasks already ready (tokio's
/// deferred wake-ups: polling `yield_now` once puts the waker there and
/// nothing else, so the future is dropped at once).
fn wake_later(cx: &mut Context<'_>) {
    let mut later = std::pin::pin!(tokio::task::yield_now());
    let _ = std::future::Future::poll(later.as_mut(), cx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn coalesce_holds_a_write_briefly_and_stops_holding_when_it_gains_nothing() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesce::default();
        // The first write of a connection goes out at once.
        assert!(c.poll_write_ready(&mut cx, 100).is_ready());
        c.flushed();
        // After a flush, a write is held for a few attempts while it grows.
        assert!(c.poll_write_ready(&mut cx, 100).is_pending());
        for _ in 1..MAX_HOLD_TRIES {
            assert!(c.poll_write_ready(&mut cx, 300).is_pending());
        }
        assert!(c.poll_write_ready(&mut cx, 300).is_ready());
        // It gained (300 > 100 bytes): the next batch is held too.
        c.flushed();
        assert!(c.poll_write_ready(&mut cx, 100).is_pending());
        assert!(c.poll_write_ready(&mut cx, MAX_HOLD_BYTES).is_ready());
        // A big batch goes at once.
        c.flushed();
        assert!(c.poll_write_ready(&mut cx, MAX_HOLD_BYTES).is_ready());
        // A hold that gained nothing turns holding off for a while.
        c.flushed();
        assert!(c.poll_write_ready(&mut cx, 100).is_pending());
        let mut out = false;
        for _ in 0..MAX_HOLD_TRIES {
            out |= c.poll_write_ready(&mut cx, 100).is_ready();
        }
        assert!(out);
        for _ in 0..SKIP_AFTER_IDLE_HOLD {
            c.flushed();
            assert!(c.poll_write_ready(&mut cx, 100).is_ready());
        }
        c.flushed();
        assert!(c.poll_write_ready(&mut cx, 100).is_pending());
    }

    #[test]
    fn a_held_write_is_woken_after_the_ready_tasks_not_at_once() {
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let count = Arc::new(Count(AtomicUsize::new(0)));
            let waker = std::task::Waker::from(count.clone());
            let mut cx = Context::from_waker(&waker);
            let mut c = Coalesce::default();
            c.flushed();
            assert!(c.poll_write_ready(&mut cx, 100).is_pending());
            // Not woken yet: a wake now would put the task straight back
            // in the queue (and wake an idle worker to steal it).
            assert_eq!(count.0.load(Ordering::SeqCst), 0);
            // The runtime runs its deferred wake-ups once its ready tasks
            // have run.
            tokio::task::yield_now().await;
            assert_eq!(count.0.load(Ordering::SeqCst), 1);
        });
    }
}
