//! `farsight convert-gguf`: a GGUF file to a Hugging Face model directory.

use std::path::PathBuf;

use clap::Args;
use farsight_engine::gguf::{convert_gguf, ConvertOptions, OutDtype};

use super::common::CliError;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The GGUF file.
    pub input: PathBuf,
    /// The directory to write (config.json, model.safetensors, tokenizer files).
    pub out_dir: PathBuf,
    /// Weight dtype of model.safetensors.
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
    pub dtype: String,
}

pub fn run(a: ConvertArgs) -> Result<(), CliError> {
    let dtype = match a.dtype.as_str() {
        "f32" => OutDtype::F32,
        "bf16" => OutDtype::BF16,
        _ => OutDtype::F16,
    };
    let summary = convert_gguf(&a.input, &a.out_dir, &ConvertOptions { dtype })
        .map_err(farsight_engine::EngineError::from)?;
    eprintln!("{summary}");
    Ok(())
}
