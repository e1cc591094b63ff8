"""Swappers: parameters and optimizer states between NVMe and the tiers that use them."""
