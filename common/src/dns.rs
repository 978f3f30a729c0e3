//! The one resolver setting shared by the roles that ask DNS: `[dns] server`.

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig,
};
use std::net::SocketAddr;

/// A resolver configuration that asks `addr` only, over UDP and TCP, on its port.
pub fn server_config(addr: SocketAddr) -> ResolverConfig {
    let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
    tcp.port = addr.port();
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    ns.connections = vec![udp, tcp];
    ResolverConfig::from_name_servers(vec![ns])
}
