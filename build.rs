//! Compiles `proto/quota/v1/broker.proto` with the pure-Rust `protox`, so a
//! fresh clone builds without a system `protoc`, and writes the descriptor set
//! that server reflection serves. The etcd v3 API (vendored under
//! `proto/etcd`, for cluster mode) is compiled the same way, client only: the
//! `etcd-client` crate would need `protoc` at build time.

use protox::prost::Message as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["quota/v1/broker.proto"], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?);
    std::fs::write(out_dir.join("quota_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    let mut etcd = protox::compile(["etcd/api/etcdserverpb/rpc.proto"], ["proto"])?;
    // Only etcd's own packages: the HTTP-gateway annotations it imports
    // matter to nobody here.
    etcd.file.retain(|f| {
        matches!(
            f.package.as_deref(),
            Some("etcdserverpb" | "mvccpb" | "authpb")
        )
    });
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
