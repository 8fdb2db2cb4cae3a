//! The engine thread: owns the model and runs the batch scheduler loop. Request handlers send
//! it [`Job`]s over a channel and read each job's [`Event`]s from its own tokio channel.
//!
//! The loop blocks while nothing runs; otherwise it takes every job that arrived, runs one
//! scheduler step, and sends each finished sequence its result. A job whose event receiver is
//! gone (the client disconnected) is cancelled at its next text delta.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use farsight_engine::batch::{
    BatchConfig, Scheduler, SchedulerStats, SeqId, SeqOutput, SeqRequest,
};
use farsight_engine::{Model, TextTokenizer};
use farsight_kernels::Backend;
use tokio::sync::mpsc::UnboundedSender;

/// A request for the engine.
pub struct Job {
    pub req: SeqRequest,
    pub events: UnboundedSender<Event>,
}

/// What the engine tells a request handler.
#[derive(Debug)]
pub enum Event {
    /// New text.
    Text(String),
    /// The sequence finished.
    Done(SeqOutput),
    /// The engine refused or failed the job.
    Error(String),
}

/// The engine's state as `/health` shows it.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EngineStatus {
    #[serde(flatten)]
    pub scheduler: SchedulerStats,
    pub running: usize,
    pub waiting: usize,
}

/// Runs the scheduler loop until every job sender is gone.
pub fn run<B: Backend>(
    model: &Model<B>,
    tok: &TextTokenizer,
    cfg: BatchConfig,
    jobs: Receiver<Job>,
    status: Arc<Mutex<EngineStatus>>,
) {
    let mut sched = match Scheduler::new(model, tok, cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("engine: {e}");
            return;
        }
    };
    let mut senders: HashMap<SeqId, UnboundedSender<Event>> = HashMap::new();
    loop {
        if sched.is_idle() {
            match jobs.recv() {
                Ok(job) => submit(&mut sched, &mut senders, job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => submit(&mut sched, &mut senders, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if sched.is_idle() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        match sched.step() {
            Ok(done) => {
                for out in done {
                    if let Some(tx) = senders.remove(&out.id) {
                        let _ = tx.send(Event::Done(out));
                    }
                }
            }
            Err(e) => {
                // A failed forward pass fails every sequence in flight; start afresh.
                tracing::error!("engine step failed: {e}");
                for (_, tx) in senders.drain() {
                    let _ = tx.send(Event::Error(format!("engine: {e}")));
                }
                let stats = sched.stats();
                match Scheduler::new(model, tok, cfg.clone()) {
                    Ok(s) => sched = s,
                    Err(e) => {
                        tracing::error!("engine: {e}");
                        return;
                    }
                }
                tracing::warn!("scheduler restarted after {} steps", stats.steps);
            }
        }
        if let Ok(mut st) = status.lock() {
            *st = EngineStatus {
                scheduler: sched.stats(),
                running: sched.running(),
                waiting: sched.waiting(),
            };
        }
    }
}

fn submit<B: Backend>(
    sched: &mut Scheduler<'_, 'static, B>,
    senders: &mut HashMap<SeqId, UnboundedSender<Event>>,
    job: Job,
) {
    let tx = job.events.clone();
    let sink = Box::new(move |d: &str| tx.send(Event::Text(d.to_string())).is_ok());
    match sched.submit(job.req, sink) {
        Ok(id) => {
            senders.insert(id, job.events);
        }
        Err(e) => {
            let _ = job.events.send(Event::Error(e.to_string()));
        }
    }
}
