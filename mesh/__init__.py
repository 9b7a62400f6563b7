"""mesh: a peer-to-peer training mesh on hivemind's DHT."""

__version__ = "0.1.0"
