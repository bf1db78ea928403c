"""Play kubelet against a real containerd: a private containerd (containerd),
locally built images (images) and a typed CRI client (client)."""
