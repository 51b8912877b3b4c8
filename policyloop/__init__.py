"""policyloop: real-time decisions that learn online."""

__version__ = "0.1.0"
