"""invoicer: a systemd-native, gap-free invoice pipeline daemon."""

__version__ = "0.1.0"
