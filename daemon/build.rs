//! Compiles proto/mulm/v1 with a pure-Rust protobuf compiler (no protoc on the build
//! machine or in a cross image), keeps the descriptor set for gRPC server reflection, and
//! records the git commit for `--version` and reports.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("..");
    let proto_dir = root.join("proto");
    let file = proto_dir.join("mulm/v1/mulm.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&proto_dir])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("mulm_v1_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;

    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    // Read when this script runs (clean builds, proto changes); an incremental dev build may
    // keep an older value.
    println!("cargo:rustc-env=MULMD_GIT_COMMIT={commit}");
    Ok(())
}
