//! What a client presents and trusts over TLS, shared by the gRPC
//! transport (`transport`) and the HTTPS client (`https`).

/// TLS settings of a client.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM of the CA that signed Central's server certificate.
    pub ca_pem: Vec<u8>,
    /// PEM certificate and key presented to Central, if any.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}
