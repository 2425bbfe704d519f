//! ferrovip: highly available virtual IPs for bare-metal Kubernetes.
