//! Virtual addresses on interfaces, via rtnetlink, marked as ours.
