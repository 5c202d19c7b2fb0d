"""Ray Serve deployments and batch jobs for Gemma; the only package that imports Ray (it comes with serving)."""
