//! A real multi-node VRRP lab in network namespaces (`ferrovip lab`, e2e tests, benchmarks).
