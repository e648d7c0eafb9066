"""What operators read and wire: health probes, metrics, logs, traces, systemd readiness."""
