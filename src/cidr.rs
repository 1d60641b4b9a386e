//! Address ranges (`10.0.0.0/16`, `fd00::/8`, or one address) for `--lb-source`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `addr` is in the range (an IPv4 address mapped into IPv6 counts as IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, addr.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                same_prefix(&net.octets(), &a.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                same_prefix(&net.octets(), &a.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn same_prefix(network: &[u8], addr: &[u8], prefix: u8) -> bool {
    let (whole, rest) = (usize::from(prefix / 8), prefix % 8);
    if network[..whole] != addr[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        network[whole] & mask == addr[whole] & mask
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let invalid = || {
            format!("'{text}' is not an address range: use e.g. 10.0.0.0/16, fd00::/8 or 10.0.0.7")
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| invalid())?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().map_err(|_| invalid())?,
            None => bits,
        };
        if prefix > bits {
            return Err(format!(
                "'{text}': a prefix of /{prefix} is longer than the address ({bits} bits)"
            ));
        }
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_contain_their_addresses() {
        assert!(cidr("10.0.0.0/16").contains(ip("10.0.255.3")));
        assert!(!cidr("10.0.0.0/16").contains(ip("10.1.0.3")));
        assert!(cidr("10.0.0.0/13").contains(ip("10.7.1.1")));
        assert!(!cidr("10.0.0.0/13").contains(ip("10.8.1.1")));
        assert!(cidr("10.0.0.7").contains(ip("10.0.0.7")));
        assert!(!cidr("10.0.0.7").contains(ip("10.0.0.8")));
        assert!(cidr("0.0.0.0/0").contains(ip("192.168.1.1")));
        assert!(cidr("fd00::/8").contains(ip("fd12::1")));
        assert!(!cidr("fd00::/8").contains(ip("10.0.0.1")));
    }

    #[test]
    fn dual_stack_peers_match_ipv4_ranges() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn bad_ranges_name_the_fix() {
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/a",
            "",
        ] {
            let error = bad.parse::<Cidr>().unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }
}
