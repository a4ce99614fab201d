//! Work a vCPU thread hands to the vmm thread and waits for.
//!
//! Register accesses arrive on vCPU threads, but some of what they ask for is I/O: a device
//! reset must wait for requests in flight on the host. vCPU threads do no host I/O (their
//! seccomp filter will not allow it, and a stuck disk must not stall a vCPU holding device
//! locks the vmm thread needs), so they queue the job here and block until the vmm thread
//! has run it. The vmm thread runs the queue from its event loop, and also while it waits
//! for vCPUs (pause, stop), so a vCPU waiting here can never deadlock it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::mpsc::sync_channel;

use vmm_sys_util::eventfd::EventFd;

type Job = Box<dyn FnOnce() + Send>;

pub struct WorkQueue {
    /// None once closed: the VM is stopping and nobody will run jobs any more.
    jobs: Mutex<Option<VecDeque<Job>>>,
    /// Readable while jobs wait; the vmm thread watches it.
    evt: EventFd,
}

impl WorkQueue {
    pub fn new() -> std::io::Result<Self> {
        Ok(WorkQueue {
            jobs: Mutex::new(Some(VecDeque::new())),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<VecDeque<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From a vCPU thread: runs `job` on the vmm thread and returns once it has run (or
    /// once the vmm thread dropped the queue without running it, as it does when the VM
    /// stops).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let (done_tx, done_rx) = sync_channel::<()>(1);
        {
            let mut jobs = self.lock();
            let Some(jobs) = jobs.as_mut() else {
                return;
            };
            jobs.push_back(Box::new(move || {
                job();
                let _ = done_tx.send(());
            }));
        }
        // A full counter still leaves the eventfd readable: nothing is lost.
        let _ = self.evt.write(1);
        let _ = done_rx.recv();
    }

    /// From the vmm thread: runs every queued job, oldest first.
    pub fn run_pending(&self) {
        let _ = self.evt.read();
        loop {
            // The lock is not held while a job runs: it may take long.
            let Some(job) = self.lock().as_mut().and_then(VecDeque::pop_front) else {
                return;
            };
            job();
        }
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Drops queued jobs without running them and refuses new ones: their vCPUs stop
    /// waiting. For stopping the VM, whose devices will not run again.
    pub fn close(&self) {
        self.lock().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn job_runs_on_the_other_thread_and_the_caller_waits() {
        let q = Arc::new(WorkQueue::new().unwrap());
        let ran_on = Arc::new(Mutex::new(None));
        let caller = {
            let q = q.clone();
            let ran_on = ran_on.clone();
            std::thread::spawn(move || {
                let slot = ran_on.clone();
                q.run(move || {
                    *slot.lock().unwrap() = Some(std::thread::current().id());
                });
                // By now the job has run.
                ran_on.lock().unwrap().is_some()
            })
        };
        // The "vmm thread": waits for the eventfd, then runs the queue.
        while q.eventfd().read().is_err() {
            std::thread::yield_now();
        }
        q.evt.write(1).unwrap();
        q.run_pending();
        assert!(caller.join().unwrap());
        assert_eq!(*ran_on.lock().unwrap(), Some(std::thread::current().id()));
    }

    #[test]
    fn closing_releases_callers_and_refuses_new_jobs() {
        let q = Arc::new(WorkQueue::new().unwrap());
        let ran = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (q, ran) = (q.clone(), ran.clone());
            std::thread::spawn(move || {
                q.run(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        while q.lock().as_ref().unwrap().is_empty() {
            std::thread::yield_now();
        }
        q.close();
        caller.join().unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        // After close, new jobs are refused at once.
        q.run(|| panic!("a closed queue ran a job"));
    }
}
