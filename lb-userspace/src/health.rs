//! Heartbeats: the scheduler that runs every due health job (TCP connect to
//! the backend on the VIP's port, plus MAC resolution while a backend has no
//! MAC) and reports outcomes to the agent, which decides up/down with
//! rise/fall and reconciles the datapath.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{net::TcpStream, task::JoinSet};

use crate::{
    agent::{Agent, CheckJob, CheckOutcome},
    neigh::Resolver,
};

/// How often the scheduler looks for due jobs.
const TICK: Duration = Duration::from_millis(20);

/// Run health jobs forever.
pub async fn run(agent: Arc<Mutex<Agent>>, resolver: Option<Resolver>) {
    let mut running = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let jobs = match agent.lock() {
                    Ok(mut a) => a.due_checks(Instant::now()),
                    Err(_) => return,
                };
                for job in jobs {
                    let r = resolver.clone();
                    running.spawn(async move {
                        let out = check(&job, r.as_ref()).await;
                        (job, out)
                    });
                }
            }
            Some(done) = running.join_next() => {
                let Ok((job, out)) = done else { continue };
                let Ok(mut a) = agent.lock() else { return };
                if let Err(e) = a.report(&job, out) {
                    log::error!("VIP {}: applying the health of {} failed: {e:#}", job.vip, job.ip);
                }
            }
        }
    }
}

/// Run one job.
pub async fn check(job: &CheckJob, resolver: Option<&Resolver>) -> CheckOutcome {
    let (ok, error) = if job.tcp {
        match tokio::time::timeout(job.timeout, TcpStream::connect((job.ip, job.vip.port))).await {
            Ok(Ok(_)) => (true, None),
            Ok(Err(e)) => (false, Some(format!("connect: {e}"))),
            Err(_) => (false, Some(format!("timeout after {} ms", job.timeout.as_millis()))),
        }
    } else {
        (true, None)
    };
    let mac = match (job.resolve_mac, resolver) {
        (true, Some(r)) => match r.resolve(job.ip).await {
            Ok(m) => m,
            Err(e) => {
                log::warn!("resolving the MAC of {} failed: {e:#}", job.ip);
                None
            }
        },
        _ => None,
    };
    CheckOutcome { ok, error, mac }
}
