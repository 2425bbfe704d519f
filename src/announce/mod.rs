//! Gratuitous ARP and unsolicited neighbour advertisements.
