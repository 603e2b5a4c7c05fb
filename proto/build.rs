//! Compiles the contract in `vncdispatch/v1/` with a vendored protoc, so a fresh machine builds
//! without a system protobuf compiler, and keeps the descriptor set for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: a build script runs on one thread; nothing reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "vncdispatch/v1/blade_agent.proto",
        "vncdispatch/v1/dispatcher.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("vncdispatch_descriptor.bin"))
        // Messages carrying a password or token get a redacting Debug (src/redact.rs), so
        // logging a request can never leak a secret.
        .skip_debug([
            "vncdispatch.v1.StartSessionRequest",
            "vncdispatch.v1.Session",
            "vncdispatch.v1.Target",
            "vncdispatch.v1.ResolveTokenRequest",
            "vncdispatch.v1.Share",
        ])
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
