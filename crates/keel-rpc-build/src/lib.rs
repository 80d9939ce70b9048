//! Code generation for Keel services, for use in `build.rs`.
//!
//! Compiles `.proto` files with the pure-Rust [`protox`] compiler (no `protoc` on the machine)
//! and generates, per package:
//! - message types with [`prost`], and their proto3 JSON mapping with `pbjson`, so every message
//!   travels in either codec;
//! - per service `S`: an async trait `S` to implement, `SServer<T>` to register it with a
//!   `keel_rpc::Server`, and `SClient<T>`, a typed client over any `CallTransport` (a
//!   `keel_rpc::Channel` by default).
//!
//! ```no_run
//! // build.rs
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     keel_rpc_build::compile_protos(&["proto/echo.proto"], &["proto"])?;
//!     Ok(())
//! }
//! ```
//! and in the crate: `pub mod echo { keel_rpc::include_proto!("keel.echo.v1"); }`.
//!
//! Unary and server-streaming methods are supported; client-streaming and bidirectional
//! methods are refused with an error naming the method.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_build::{Service, ServiceGenerator};

/// Why code generation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `.proto` files do not compile.
    #[error("compiling .proto files: {0}")]
    Proto(#[from] protox::Error),
    /// prost or pbjson could not generate or write code.
    #[error("generating Rust code: {0}")]
    Codegen(#[from] std::io::Error),
    /// A streaming shape Keel does not support yet.
    #[error("{service}.{method}: client-streaming and bidirectional methods are not supported")]
    Unsupported {
        /// The service.
        service: String,
        /// The method.
        method: String,
    },
    /// `OUT_DIR` is not set and no output directory was given.
    #[error("OUT_DIR is not set: run from build.rs or set an output directory")]
    NoOutDir,
}

/// Compiles `protos` (searched for in `includes`) into `OUT_DIR`.
pub fn compile_protos(
    protos: &[impl AsRef<Path>],
    includes: &[impl AsRef<Path>],
) -> Result<(), Error> {
    Builder::new().compile(protos, includes)
}

/// Code generation settings.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    out_dir: Option<PathBuf>,
    bytes: Vec<String>,
}

impl Builder {
    /// Default settings: output to `OUT_DIR`.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Writes generated files to `dir` instead of `OUT_DIR`.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.out_dir = Some(dir.into());
        self
    }

    /// Generates `bytes::Bytes` instead of `Vec<u8>` for the `bytes` fields under these
    /// protobuf paths (`"."` for all, `".pkg.Message.field"` for one). A decoded `Bytes`
    /// field shares the received frame's buffer instead of copying it, which matters for large
    /// payloads.
    pub fn bytes<S: Into<String>>(mut self, paths: impl IntoIterator<Item = S>) -> Builder {
        self.bytes.extend(paths.into_iter().map(Into::into));
        self
    }

    /// Compiles `protos` (searched for in `includes`).
    pub fn compile(
        &self,
        protos: &[impl AsRef<Path>],
        includes: &[impl AsRef<Path>],
    ) -> Result<(), Error> {
        let out_dir = match &self.out_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(std::env::var_os("OUT_DIR").ok_or(Error::NoOutDir)?),
        };
        for p in protos {
            println!("cargo:rerun-if-changed={}", p.as_ref().display());
        }
        for i in includes {
            println!("cargo:rerun-if-changed={}", i.as_ref().display());
        }
        let fds = protox::compile(protos, includes)?;

        // Only the packages of the files asked for get JSON code; imports bring their own. Each
        // package once, though several files may share it (its JSON code is one file).
        let wanted: Vec<String> = protos
            .iter()
            .filter_map(|p| {
                let name = p.as_ref();
                fds.file.iter().find(|f| {
                    let fname = Path::new(f.name());
                    name.ends_with(fname)
                })
            })
            .map(|f| format!(".{}", f.package()))
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect();
        for file in &fds.file {
            for service in &file.service {
                for method in &service.method {
                    if method.client_streaming() {
                        return Err(Error::Unsupported {
                            service: format!("{}.{}", file.package(), service.name()),
                            method: method.name().to_owned(),
                        });
                    }
                }
            }
        }
        let descriptor_bytes = fds.encode_to_vec();

        let mut config = prost_build::Config::new();
        config
            .out_dir(&out_dir)
            .prost_path("::keel_rpc::__private::prost")
            .compile_well_known_types()
            .extern_path(".google.protobuf", "::keel_rpc::__private::pbjson_types")
            .bytes(&self.bytes)
            .service_generator(Box::new(KeelGenerator));
        config.compile_fds(fds)?;

        pbjson_build::Builder::new()
            .register_descriptors(&descriptor_bytes)?
            .out_dir(&out_dir)
            .build(&wanted)?;
        // pbjson names its runtime crate by absolute path in places; point those at the copy
        // keel-rpc re-exports, so a service crate needs no direct pbjson dependency.
        for package in &wanted {
            let path = out_dir.join(format!("{}.serde.rs", package.trim_start_matches('.')));
            if let Ok(code) = std::fs::read_to_string(&path) {
                let code = code.replace("::pbjson::", "::keel_rpc::__private::pbjson::");
                std::fs::write(&path, code)?;
            }
        }
        Ok(())
    }
}

/// Writes the service trait, server wrapper and client for each service.
struct KeelGenerator;

impl ServiceGenerator for KeelGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let name = &service.name;
        let full_name = if service.package.is_empty() {
            service.proto_name.clone()
        } else {
            format!("{}.{}", service.package, service.proto_name)
        };
        let server = format!("{name}Server");
        let client = format!("{name}Client");

        // The trait.
        if service.comments.leading.is_empty() {
            let _ = writeln!(buf, "/// The `{full_name}` service, to implement.");
        }
        service.comments.append_with_indent(0, buf);
        let _ = writeln!(
            buf,
            "pub trait {name}: ::core::marker::Send + ::core::marker::Sync + 'static {{"
        );
        for m in &service.methods {
            if m.comments.leading.is_empty() {
                let _ = writeln!(buf, "    /// Handles `{}`.", m.proto_name);
            }
            m.comments.append_with_indent(1, buf);
            let output = if m.server_streaming {
                format!("::keel_rpc::ResponseStream<{}>", m.output_type)
            } else {
                m.output_type.clone()
            };
            let _ = writeln!(
                buf,
                "    fn {}(&self, ctx: ::keel_rpc::Context, request: {}) -> impl ::core::future::Future<Output = ::core::result::Result<{output}, ::keel_rpc::Status>> + ::core::marker::Send;",
                m.name, m.input_type
            );
        }
        let _ = writeln!(buf, "}}");

        // The server wrapper.
        let _ = writeln!(
            buf,
            r#"/// Registers an implementation of [`{name}`] with a `keel_rpc::Server`.
pub struct {server}<T>(::std::sync::Arc<T>);

impl<T> ::core::fmt::Debug for {server}<T> {{
    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{
        f.write_str("{server}")
    }}
}}

impl<T: {name}> {server}<T> {{
    /// The service's fully qualified name.
    pub const NAME: &'static str = "{full_name}";

    /// Wraps an implementation.
    pub fn new(inner: T) -> Self {{
        Self(::std::sync::Arc::new(inner))
    }}

    /// Wraps a shared implementation.
    pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{
        Self(inner)
    }}
}}

impl<T: {name}> ::keel_rpc::server::IntoService for {server}<T> {{
    fn into_service(self) -> ::keel_rpc::ServiceDef {{
        ::keel_rpc::ServiceDef::new(Self::NAME)"#
        );
        for m in &service.methods {
            let kind = if m.server_streaming {
                "server_streaming"
            } else {
                "unary"
            };
            let _ = writeln!(
                buf,
                r#"            .{kind}("{proto}", {{
                let inner = self.0.clone();
                move |ctx, request: {input}| {{
                    let inner = inner.clone();
                    async move {{ inner.{method}(ctx, request).await }}
                }}
            }})"#,
                proto = m.proto_name,
                input = m.input_type,
                method = m.name,
            );
        }
        let _ = writeln!(buf, "    }}\n}}");

        // The client.
        let _ = writeln!(
            buf,
            r#"/// Typed client for `{full_name}` over any `keel_rpc::client::CallTransport`.
#[derive(Clone, Debug)]
pub struct {client}<T = ::keel_rpc::Channel> {{
    transport: T,
}}

impl<T: ::keel_rpc::client::CallTransport> {client}<T> {{
    /// The service's fully qualified name.
    pub const NAME: &'static str = "{full_name}";

    /// A client sending its calls through `transport`.
    pub fn new(transport: T) -> Self {{
        Self {{ transport }}
    }}

    /// The transport.
    pub fn transport(&self) -> &T {{
        &self.transport
    }}"#
        );
        for m in &service.methods {
            let (helper, output) = if m.server_streaming {
                (
                    "server_streaming",
                    format!("::keel_rpc::Streaming<{}>", m.output_type),
                )
            } else {
                ("unary", m.output_type.clone())
            };
            let mut doc = String::new();
            m.comments.append_with_indent(1, &mut doc);
            if doc.is_empty() {
                doc = format!("    /// Calls `{}`.\n", m.proto_name);
            }
            let _ = writeln!(
                buf,
                r#"
{doc}    pub async fn {method}(&self, request: &{input}) -> ::core::result::Result<{output}, ::keel_rpc::Status> {{
        self.{method}_with(request, ::keel_rpc::CallOptions::default()).await
    }}

    /// Like [`Self::{method}`], with per-call options (timeout, codec, metadata).
    pub async fn {method}_with(&self, request: &{input}, options: ::keel_rpc::CallOptions) -> ::core::result::Result<{output}, ::keel_rpc::Status> {{
        ::keel_rpc::client::{helper}(&self.transport, Self::NAME, "{proto}", request, options).await
    }}"#,
                method = m.name,
                input = m.input_type,
                proto = m.proto_name,
            );
        }
        let _ = writeln!(buf, "}}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_streaming_methods_are_refused_with_their_name() {
        let dir = std::env::temp_dir().join(format!("keel-rpc-build-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let proto = dir.join("up.proto");
        std::fs::write(
            &proto,
            "syntax = \"proto3\";\npackage t;\nmessage A {}\nservice S { rpc Up(stream A) returns (A); }\n",
        )
        .unwrap();
        let err = Builder::new()
            .out_dir(&dir)
            .compile(&[&proto], &[&dir])
            .unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        match err {
            Error::Unsupported { service, method } => {
                assert_eq!((service.as_str(), method.as_str()), ("t.S", "Up"));
            }
            other => panic!("expected Unsupported, got {other}"),
        }
    }
}
