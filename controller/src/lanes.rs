//! Which of the controller's work the OS runs first. The agents' lane (their sessions, the
//! rollout executors, the converger, the lost-host watcher, the operators' HTTP listener)
//! runs on the runtime the controller starts on; the clients' lane (the TLS handshakes of peers
//! not yet known, and every connection that presents no agent certificate: `fleetctl`, CI,
//! joins) runs on a runtime of its own whose threads run [`CLIENTS_NICE_STEPS`] nice steps
//! below the controller's own priority. A burst of client calls then takes the cores only
//! when the agents' lane leaves them idle, and a rollout keeps its pace under it
//! (RELIABILITY.md, "Under load"). The edge tells the lanes apart (`crate::edge::lane_of`);
//! this module makes the runtime and sets the threads' priority.

/// How many nice steps the clients' threads run below the controller's own (capped at 19,
/// the lowest). Ten steps weigh about a tenth as much with the kernel's fair scheduler: the
/// clients' lane still gets its share when the host is busy with other work.
pub const CLIENTS_NICE_STEPS: i32 = 10;

/// The lowest priority a thread can have.
const LOWEST_NICE: i32 = 19;

/// The nice value of the calling thread (Linux keeps one per thread).
#[allow(unsafe_code)]
pub fn nice_of_this_thread() -> std::io::Result<i32> {
    let tid = nix::unistd::gettid().as_raw();
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes two integers and touches no memory of ours.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    // -1 is also a valid nice value: errno tells them apart.
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(nice)
}

/// Sets the calling thread's nice value (only this thread's: Linux keeps one per thread).
#[allow(unsafe_code)]
fn set_nice_of_this_thread(nice: i32) -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes three integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The nice value of the clients' lane for a controller running at `own`.
pub fn clients_nice(own: i32) -> i32 {
    own.saturating_add(CLIENTS_NICE_STEPS).min(LOWEST_NICE)
}

/// The clients' runtime: `workers` worker threads, and its blocking threads, all at
/// [`clients_nice`] of the calling thread's nice value. A thread whose priority cannot be
/// lowered says so once in the log and runs on (at the controller's priority).
pub fn clients_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let nice = clients_nice(nice_of_this_thread()?);
    let warned = std::sync::atomic::AtomicBool::new(false);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("fleet-clients")
        .on_thread_start(move || {
            if let Err(e) = set_nice_of_this_thread(nice) {
                if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot lower the priority of the threads that serve clients to nice {nice} ({e}): a burst of client calls can slow rollouts down"
                    );
                }
            }
        })
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_lane_is_ten_steps_lower_and_never_past_the_lowest() {
        for (own, lane) in [(0, 10), (-5, 5), (5, 15), (9, 19), (15, 19), (19, 19)] {
            assert_eq!(clients_nice(own), lane, "controller at nice {own}");
        }
    }

    #[test]
    fn the_clients_runtime_runs_its_workers_and_blocking_threads_lower_and_leaves_the_caller() {
        let own = nice_of_this_thread().unwrap();
        let clients = clients_runtime(1).unwrap();
        let on_worker = clients
            .block_on(clients.spawn(async { nice_of_this_thread().unwrap() }))
            .unwrap();
        let on_blocking = clients
            .block_on(clients.spawn_blocking(|| nice_of_this_thread().unwrap()))
            .unwrap();
        // A blocking thread started from a worker (as a call's store read is).
        let from_worker = clients
            .block_on(clients.spawn(async {
                tokio::task::spawn_blocking(|| nice_of_this_thread().unwrap())
                    .await
                    .unwrap()
            }))
            .unwrap();
        assert_eq!(on_worker, clients_nice(own));
        assert_eq!(on_blocking, clients_nice(own));
        assert_eq!(from_worker, clients_nice(own));
        assert_eq!(
            nice_of_this_thread().unwrap(),
            own,
            "the thread that made the runtime keeps its priority"
        );
        // The main runtime's threads (the agents' lane) keep the controller's priority.
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let on_main = main
            .block_on(main.spawn(async { nice_of_this_thread().unwrap() }))
            .unwrap();
        assert_eq!(on_main, own);
        if own < LOWEST_NICE {
            assert!(on_worker > own, "lowered: {on_worker} against {own}");
        }
    }
}
