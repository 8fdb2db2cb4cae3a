//! The markdown tables `farsight bench offload` prints from its JSON report.

use std::io::Write;

use super::GIB;

pub(super) fn print_tables(r: &serde_json::Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "| context | batch | budget | rows/KV head | ms/step median [min, max] | tok/s | hit rate | PCIe MB/step | PCIe floor ms | HBM floor ms | transfer-only ms | stall ms | chain ms | gather blocks | row cache | page tokens | recall | GPU GiB used |")?;
    writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let opt = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |v| format!("{v:.2}"));
    for x in r["offloaded"].as_array().into_iter().flatten() {
        if let Some(e) = x.get("error") {
            writeln!(
                out,
                "| {} | {} | - | - | error: {} | | | | | | | | | | | | | |",
                x["context"],
                x["batch"],
                e.as_str().unwrap_or("")
            )?;
            continue;
        }
        let s = &x["step_ms"];
        writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} [{:.2}, {:.2}] | {:.1} | {:.3} | {:.1} | {:.2} | {:.2} | {} | {} | {} | {} | {}x | {} | {} | {:.2} |",
            x["context"],
            x["batch"],
            x["budget"].as_str().unwrap_or(""),
            x["rows_per_kv_head"],
            f(&s["median"]),
            f(&s["min"]),
            f(&s["max"]),
            f(&x["tok_s"]),
            f(&x["hit_rate"]),
            f(&x["pcie_bytes_per_step"]) / 1e6,
            f(&x["pcie_floor_ms"]),
            f(&x["hbm_floor_ms"]),
            x["transfer_only_ms"]["median"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.2}")),
            opt(&x["stall_ms_per_step"]),
            opt(&x["chain_ms_per_step"]),
            x["gather_blocks"],
            x["row_cache"],
            x["page_tokens"],
            x["recall"].as_f64().map_or("-".into(), |v| format!("{v:.3}")),
            f(&x["gpu_used_bytes"]) / GIB,
        )?;
    }
    writeln!(out, "\nreferences (same run):")?;
    for x in r["references"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "- context {} batch {}: {}",
            x["context"],
            x["batch"],
            serde_json::to_string(x).unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "\nreproduce: `{}`",
        r["command"].as_str().unwrap_or("")
    )?;
    Ok(())
}
