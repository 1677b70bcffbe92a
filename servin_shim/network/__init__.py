"""Pod networking: network namespaces now, CNI plugins on top of them."""
