//! The agent's background loops besides health checks: HA readiness and
//! announcements, and the connection-table census.

use std::sync::{Arc, Mutex};

use crate::agent::Agent;

/// Every `ha::TICK`: record the node's readiness (for `xlb ha check`) and,
/// with `--announce-table`, make the table hold a route for exactly the
/// ready VIP addresses. Errors are logged and retried on the next tick.
pub(super) async fn ha_loop(agent: Arc<Mutex<Agent>>, node: Arc<crate::ha::Node>, announcer: Option<crate::ha::Announcer>) {
    let mut tick = tokio::time::interval(crate::ha::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(bool, Option<String>)> = None;
    loop {
        tick.tick().await;
        let Ok(v) = agent.lock().map(|a| a.ha_verdict(node.drained())) else { return };
        if last.as_ref() != Some(&(v.ready, v.why.clone())) {
            match &v.why {
                None => log::info!("HA: ready ({} VIP address(es))", v.announce.len()),
                Some(why) => log::info!("HA: not ready: {why}"),
            }
            last = Some((v.ready, v.why.clone()));
        }
        if let Err(e) = node.record(&v) {
            log::warn!("HA: {e:#}");
        }
        if let Some(a) = &announcer {
            if let Err(e) = a.reconcile(&v.announce.iter().copied().collect()).await {
                log::warn!("HA: announcements: {e:#}");
            }
        }
    }
}

/// How often the connection table is walked to correct active-flow counts.
const CENSUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Every `CENSUS_INTERVAL`, walk the connection table (on a blocking thread,
/// through a second map handle, without holding the agent) and set every
/// backend's active-flow count from it. Between censuses the datapath counts
/// opens and FIN/RST closes itself; the census corrects flows that ended
/// otherwise (idle UDP, evicted entries). Opens and closes that happen during
/// the walk can be off by their number until the next census.
pub(super) async fn census_loop(agent: Arc<Mutex<Agent>>) {
    let reader = match agent.lock().map(|a| a.dp.conntrack_reader()) {
        Ok(Ok(r)) => Arc::new(r),
        Ok(Err(e)) => {
            log::warn!("no connection-table census: {e:#}");
            return;
        }
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(CENSUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = reader.clone();
        let Ok(census) = tokio::task::spawn_blocking(move || r.census()).await else { return };
        let Ok(ids) = agent.lock().map(|a| a.census_backends()) else { return };
        for part in ids.chunks(64) {
            let applied = match agent.lock() {
                Ok(mut a) => a.apply_census_to(&census, part),
                Err(_) => return,
            };
            if let Err(e) = applied {
                log::warn!("applying the connection-table census failed: {e:#}");
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
