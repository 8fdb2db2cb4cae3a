//! Command-line definitions and dispatch.

mod batch;
mod bench;
mod bench_attention;
mod bench_offload;
mod bench_synthetic;
mod calibrate;
pub(crate) mod common;
mod convert;
mod eval;
mod generate;
mod jsonl;
mod plot;
mod preflight;
mod report;
pub(crate) mod serve;
mod sparse;

use clap::{Parser, Subcommand};

pub use common::CliError;

/// farsight: long-context LLM inference with the KV cache off the GPU.
#[derive(Parser, Debug)]
#[command(name = "farsight", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a continuation of a prompt (or a chat reply with --chat).
    Generate(generate::GenerateArgs),
    /// Rank each KV head's channels for Double Sparsity labels (writes a calibration file).
    Calibrate(calibrate::CalibrateArgs),
    /// Evaluate the model on a text.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Convert a GGUF file into a Hugging Face model directory.
    ConvertGguf(convert::ConvertArgs),
    /// Run a JSONL file of documents through the batch scheduler (resumable, shardable).
    Batch(batch::BatchArgs),
    /// Serve the OpenAI completions and chat completions API over HTTP.
    Serve(serve::ServeArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Reports (memory footprint per tier).
    #[command(subcommand)]
    Report(report::ReportCommand),
}

/// Sets up `tracing` output on stderr.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FARSIGHT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Eval(c) => eval::run(c),
        Command::ConvertGguf(a) => convert::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Batch(a) => batch::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Report(c) => report::run(c),
    }
}
