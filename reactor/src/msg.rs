//! Fixed-slot messages, as SPDK's `spdk_msg` (a function and its context in
//! a preallocated slot): a closure of up to [`INLINE_WORDS`] words (an `Arc`
//! and a few ids, the usual message; an I/O and its channel) is stored in
//! the slot itself, so sending it allocates nothing; a larger one is boxed,
//! and the slot holds the box. Also io_uring's completion callbacks (with
//! the CQE result as argument).

use std::mem::{align_of, size_of, ManuallyDrop, MaybeUninit};
use std::ptr;

/// Words of closure state a slot holds without a heap allocation.
pub const INLINE_WORDS: usize = 6;

type Words = [usize; INLINE_WORDS];

/// A `FnOnce(A)` in a fixed-size slot (`A = ()` for messages).
pub(crate) struct Slot<A = ()> {
    /// Runs the closure, consuming it from the slot.
    call: unsafe fn(*mut u8, A),
    /// Drops the closure without running it.
    drop: unsafe fn(*mut u8),
    data: MaybeUninit<Words>,
}

unsafe fn call_inline<A, F: FnOnce(A)>(p: *mut u8, a: A) {
    // SAFETY (caller): `p` holds an initialised F, read exactly once.
    let f = unsafe { ptr::read(p as *mut F) };
    f(a)
}

unsafe fn drop_inline<F>(p: *mut u8) {
    // SAFETY (caller): `p` holds an initialised F, dropped exactly once.
    unsafe { ptr::drop_in_place(p as *mut F) }
}

unsafe fn call_boxed<A, F: FnOnce(A)>(p: *mut u8, a: A) {
    // SAFETY (caller): `p` holds a pointer from Box::into_raw, taken once.
    let f = unsafe { Box::from_raw(ptr::read(p as *mut *mut F)) };
    f(a)
}

unsafe fn drop_boxed<F>(p: *mut u8) {
    // SAFETY (caller): as call_boxed.
    drop(unsafe { Box::from_raw(ptr::read(p as *mut *mut F)) })
}

impl Slot<()> {
    /// A message: a closure without arguments.
    #[inline]
    pub(crate) fn new<F: FnOnce() + 'static>(f: F) -> Slot {
        Slot::with_arg(move |()| f())
    }
}

impl<A> Slot<A> {
    #[inline]
    pub(crate) fn with_arg<F: FnOnce(A) + 'static>(f: F) -> Slot<A> {
        let mut data = MaybeUninit::<Words>::uninit();
        if size_of::<F>() <= size_of::<Words>() && align_of::<F>() <= align_of::<Words>() {
            // SAFETY: F fits the slot in size and alignment (checked above);
            // the slot owns it from here on (run or dropped exactly once).
            unsafe { ptr::write(data.as_mut_ptr() as *mut F, f) };
            Slot {
                call: call_inline::<A, F>,
                drop: drop_inline::<F>,
                data,
            }
        } else {
            let p = Box::into_raw(Box::new(f));
            // SAFETY: a pointer fits the slot; the slot owns the box.
            unsafe { ptr::write(data.as_mut_ptr() as *mut *mut F, p) };
            Slot {
                call: call_boxed::<A, F>,
                drop: drop_boxed::<F>,
                data,
            }
        }
    }

    /// Run the closure with `a` (once: this consumes the slot).
    #[inline]
    pub(crate) fn run_with(self, a: A) {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: the slot holds its closure (it was never run: this takes
        // self, and Drop will not run for `me`); `call` consumes it. If the
        // closure panics, it was moved out first and unwinds as a local.
        unsafe { (me.call)(me.data.as_mut_ptr() as *mut u8, a) }
    }
}

impl Slot<()> {
    /// Run the closure (once: this consumes the slot).
    #[inline]
    pub(crate) fn run(self) {
        self.run_with(())
    }
}

impl<A> Drop for Slot<A> {
    fn drop(&mut self) {
        // SAFETY: a slot that is dropped was never run (run() forgets it).
        unsafe { (self.drop)(self.data.as_mut_ptr() as *mut u8) }
    }
}

/// A slot whose closure is `Send`: what crosses reactors.
pub(crate) struct SendSlot(Slot);

// SAFETY: only built from `F: Send` closures (below).
unsafe impl Send for SendSlot {}

impl SendSlot {
    #[inline]
    pub(crate) fn new<F: FnOnce() + Send + 'static>(f: F) -> SendSlot {
        SendSlot(Slot::new(f))
    }

    #[inline]
    pub(crate) fn run(self) {
        self.0.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts drops of what a closure captured.
    struct Tracker(Arc<AtomicUsize>);
    impl Drop for Tracker {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn small_and_large_closures_run_once_and_drop_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let ran = Rc::new(std::cell::Cell::new(0u64));
        // Small: a tracker and an Rc (two words) stay in the slot.
        let (t, r) = (Tracker(drops.clone()), ran.clone());
        let s = Slot::new(move || {
            let _t = &t;
            r.set(r.get() + 1);
        });
        s.run();
        assert_eq!((ran.get(), drops.load(Ordering::SeqCst)), (1, 1));
        // Large: 8 words of state go through a box.
        let (t, r, big) = (Tracker(drops.clone()), ran.clone(), [7u64; 8]);
        assert!(std::mem::size_of_val(&big) > size_of::<Words>());
        let s = Slot::new(move || {
            let _t = &t;
            r.set(r.get() + big.iter().sum::<u64>());
        });
        s.run();
        assert_eq!((ran.get(), drops.load(Ordering::SeqCst)), (57, 2));
        // Dropped unrun, both kinds drop their state exactly once.
        let t = Tracker(drops.clone());
        drop(Slot::new(move || drop(t)));
        let (t, big) = (Tracker(drops.clone()), [1u8; 100]);
        drop(Slot::new(move || {
            let _t = &t;
            let _ = big;
        }));
        assert_eq!(drops.load(Ordering::SeqCst), 4);
        assert_eq!(ran.get(), 57);
    }

    #[test]
    fn closures_with_an_argument() {
        let got = Rc::new(std::cell::Cell::new(0i32));
        let g = got.clone();
        Slot::with_arg(move |res: i32| g.set(res)).run_with(-5);
        assert_eq!(got.get(), -5);
        let (g, big) = (got.clone(), [3i32; 20]);
        Slot::with_arg(move |res: i32| g.set(res + big.iter().sum::<i32>())).run_with(1);
        assert_eq!(got.get(), 61);
    }

    #[test]
    fn a_panicking_closure_drops_its_state_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let t = Tracker(drops.clone());
        let s = SendSlot::new(move || {
            let _t = &t;
            panic!("boom");
        });
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.run())).is_err());
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
