"""Connection-based autoscaling of the proxy Deployment: pure policy, scraping, the per-cluster
loop and the capacity plan."""
