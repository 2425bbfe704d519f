//! VRRP state machine.
