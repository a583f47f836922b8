"""What the planes report for the operator: metrics, traces and the workers' status."""
