//! Node I/O for the VRRP driver: addresses and links over rtnetlink, the raw VRRP sockets and
//! the precise timer, gratuitous ARP / unsolicited NA. Nothing here decides anything; the
//! engine decides and the driver calls these.

pub mod addr;
pub mod announce;
pub mod link;
pub mod ndp;
pub mod ownership;
pub mod route;
pub mod socket;
