//! A small team of helper threads that spin while products keep coming, for splitting matrix
//! products (4-bit and float32) and attention's tiles across `--threads` without a wake-up per
//! product.
//!
//! tract's rayon pool parks its workers between jobs, and a decode step of mulm-28m q4 runs 57
//! products of 10–60 µs each: waking a parked worker costs about as long as the share it
//! would compute, so splitting there bought nothing (2 threads: 1081 → 837 tok/s in run g of
//! bench/RESULTS.md). llama.cpp's workers poll instead. Here helpers poll for a new task for
//! [`SPIN`] after the last one, then sleep; and the calling thread never waits for a helper
//! to wake: it takes shares from the same counter as the helpers, so a share no helper has
//! started by the time the caller gets to it, the caller computes itself. With every helper
//! asleep a product costs what it does on one thread.

use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper polls for a task after its last one before it sleeps. Longer than the
/// gap between two products of one decode step, or between steps (sampling, words), so a
/// generation keeps its helpers awake; short enough that an idle daemon burns nothing.
const SPIN: Duration = Duration::from_millis(2);

/// A caller's task: `count` shares, each run once by whichever thread takes it.
struct Task<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    count: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Task<'_> {
    /// Runs shares until none are left to take.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.count {
                return;
            }
            if panic::catch_unwind(AssertUnwindSafe(|| (self.run)(i))).is_err() {
                self.panicked.store(true, Relaxed);
            }
            // Release: the share's writes are visible to the caller once it sees the count.
            self.done.fetch_add(1, Release);
        }
    }
}

struct Shared {
    /// The task on offer, or null. Points into the caller's stack frame: see [`Team::run`]
    /// for why no helper can read it after that frame is gone.
    task: AtomicPtr<Task<'static>>,
    /// Bumped for every task offered; a helper polls it.
    offered: AtomicU64,
    /// Helpers between loading `task` and their last touch of it.
    busy: AtomicUsize,
    /// Helpers asleep, or about to be.
    asleep: AtomicUsize,
    stop: AtomicBool,
    /// One caller at a time: a second runs its product alone rather than wait.
    caller: Mutex<()>,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// `threads − 1` helpers and whichever thread calls [`Team::run`].
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team for `threads` threads in all: the caller and `threads − 1` helpers.
    pub fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            task: AtomicPtr::new(ptr::null_mut()),
            offered: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            asleep: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            caller: Mutex::new(()),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        // A helper the system will not start (a task limit, say) leaves the team smaller.
        let helpers = (1..threads.max(1))
            .filter_map(|i| {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new().name(format!("mulmd-team-{i}")).spawn(move || helper(&shared));
                spawned.map_err(|e| tracing::warn!("4-bit products get one thread fewer: starting a helper failed: {e}")).ok()
            })
            .collect();
        Team { shared, helpers }
    }

    /// The team shared by every product run with `threads` threads, made on first use. It has
    /// no more threads than the calling thread may run on: a polling helper without a core of
    /// its own takes time from the thread it should be helping. Helpers inherit the CPU
    /// affinity of the thread that makes the team: the daemon's first product runs in
    /// `Model::load`, while `server.rs` has pinned it to `engine.cpu_affinity`.
    pub fn for_threads(threads: usize) -> Arc<Team> {
        static TEAMS: OnceLock<Mutex<Vec<(usize, Arc<Team>)>>> = OnceLock::new();
        let mut teams = TEAMS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, team)) = teams.iter().find(|(t, _)| *t == threads) {
            return team.clone();
        }
        // Only here, once per team: the core count costs a system call and cgroup file reads,
        // which on every product took more than half the decode step's time.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let team = Arc::new(Team::new(threads.clamp(1, cores)));
        teams.push((threads, team.clone()));
        team
    }

    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `run(i)` once for every `i` in `0..count`, on this thread and on the helpers that
    /// are awake, and returns when all have run. A panic in any share is raised here.
    pub fn run(&self, count: usize, run: &(dyn Fn(usize) + Sync)) {
        let shared = &*self.shared;
        // A share that panicked poisoned the lock on its way out; the team itself is fine.
        let _caller = match shared.caller.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..count).for_each(run);
                return;
            }
        };
        let task = Task { run, count, next: AtomicUsize::new(0), done: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
        shared.task.store((&task as *const Task).cast_mut().cast(), SeqCst);
        shared.offered.fetch_add(1, SeqCst);
        if shared.asleep.load(SeqCst) > 0 {
            let _sleep = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        task.work();
        while task.done.load(Acquire) < count {
            std::hint::spin_loop();
        }
        // Withdraw the task, then wait out every helper that loaded it before it was withdrawn.
        // All four operations are SeqCst: a helper that read the pointer raised `busy` first,
        // so it is counted here; one that raises `busy` after this read finds null.
        shared.task.store(ptr::null_mut(), SeqCst);
        while shared.busy.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if task.panicked.load(Relaxed) {
            panic!("a 4-bit product's share panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _sleep = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

fn helper(shared: &Shared) {
    let mut seen = shared.offered.load(SeqCst);
    loop {
        let mut idle_since = Instant::now();
        let mut polls = 0u32;
        loop {
            if shared.stop.load(Relaxed) {
                return;
            }
            let offered = shared.offered.load(Acquire);
            if offered != seen {
                seen = offered;
                break;
            }
            std::hint::spin_loop();
            polls = polls.wrapping_add(1);
            if polls % 1024 == 0 && idle_since.elapsed() > SPIN {
                sleep_until_offered(shared, seen);
                idle_since = Instant::now();
            }
        }
        shared.busy.fetch_add(1, SeqCst);
        let task = shared.task.load(SeqCst);
        if !task.is_null() {
            // SAFETY: `busy` was raised before the pointer was read, so `Team::run` has not
            // returned: it waits for `busy` to fall to zero after withdrawing the task.
            unsafe { (*task).work() };
        }
        shared.busy.fetch_sub(1, SeqCst);
    }
}

/// Sleeps until a task newer than `seen` is offered or the team stops.
fn sleep_until_offered(shared: &Shared, seen: u64) {
    let mut sleep = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
    shared.asleep.fetch_add(1, SeqCst);
    // Checked after `asleep` is raised: a caller that offered before then is seen here; one
    // that offers after sees `asleep` and notifies under the same lock.
    while shared.offered.load(SeqCst) == seen && !shared.stop.load(SeqCst) {
        sleep = shared.wake.wait(sleep).unwrap_or_else(|e| e.into_inner());
    }
    shared.asleep.fetch_sub(1, SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn runs_each_share_once(team: &Team, count: usize) {
        let hits: Vec<AtomicU32> = (0..count).map(|_| AtomicU32::new(0)).collect();
        team.run(count, &|i| {
            hits[i].fetch_add(1, Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "every share exactly once");
    }

    #[test]
    fn every_share_runs_once_whether_helpers_are_awake_or_asleep() {
        let team = Team::new(3);
        assert_eq!(team.threads(), 3);
        for count in [0, 1, 2, 7, 64] {
            runs_each_share_once(&team, count);
        }
        // Past the spin time the helpers sleep; the next task must still complete.
        std::thread::sleep(SPIN * 3);
        runs_each_share_once(&team, 16);
    }

    #[test]
    fn callers_on_several_threads_each_get_their_own_shares() {
        let team = Arc::new(Team::new(2));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let team = team.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        runs_each_share_once(&team, 9);
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_share_panics_the_caller_and_the_team_keeps_working() {
        let team = Team::new(2);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            team.run(4, &|i| {
                if i == 2 {
                    panic!("share 2");
                }
            })
        }));
        assert!(result.is_err());
        runs_each_share_once(&team, 8);
    }

    #[test]
    fn a_one_thread_team_has_no_helpers() {
        let team = Team::new(1);
        assert_eq!(team.threads(), 1);
        runs_each_share_once(&team, 5);
    }
}
