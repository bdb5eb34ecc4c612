"""edgeprune: measurement-driven compression and deployment of neural networks on MCUs."""

__version__ = "0.1.0"
