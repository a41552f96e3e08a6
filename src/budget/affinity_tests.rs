//! Homes without servers: who a terminated home ends, and that a home leaves the books with its client.

use super::*;

#[test]
fn a_terminated_home_ends_only_the_clients_that_used_it_within_the_window() {
    let a = Arc::new(Affinity::default());
    let (idle, busy, elsewhere) = (a.home(7), a.home(7), a.home(8));
    std::thread::sleep(Duration::from_millis(80));
    busy.touch_at(Instant::now());
    assert_eq!(a.homed(7), 2);
    assert_eq!(a.terminated(7, Duration::from_millis(40)), 1, "only the client that used it in the last 40 ms");
    assert!(busy.signal.ended.load(Ordering::Acquire));
    assert!(!idle.signal.ended.load(Ordering::Acquire), "idle past the window: shielded");
    assert!(!elsewhere.signal.ended.load(Ordering::Acquire), "another server's client");
    assert_eq!(a.homed(7), 0, "the dead server is nobody's home any more");
    assert_eq!(a.homed(8), 1);
}

#[test]
fn a_zero_window_shields_everyone_and_homes_leave_with_their_clients() {
    let a = Arc::new(Affinity::default());
    let h = a.home(9);
    h.touch_at(Instant::now());
    assert_eq!(a.terminated(9, Duration::ZERO), 0);
    assert!(!h.signal.ended.load(Ordering::Acquire));
    let (x, y) = (a.home(10), a.home(10));
    drop(x);
    assert_eq!(a.homed(10), 1);
    drop(y);
    assert_eq!(a.homed(10), 0);
}

#[tokio::test]
async fn an_ended_home_wakes_the_relay_registered_once() {
    let a = Arc::new(Affinity::default());
    let h = a.home(11);
    let signal = h.signal.clone();
    // Registered on the first poll only, as the relay does: the signal fires once.
    let mut registered = false;
    let waiter = tokio::spawn(std::future::poll_fn(move |cx| {
        if !registered {
            signal.register(cx.waker());
            registered = true;
        }
        if signal.is_ended() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }));
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    assert_eq!(a.terminated(11, Duration::from_secs(10)), 1);
    tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("woken").unwrap();
}
