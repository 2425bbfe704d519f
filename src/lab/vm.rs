//! qemu VM harness for tests that need a real IPVS kernel (being written).
