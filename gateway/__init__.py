"""The Envoy sidecar: renders its config from the settings and runs it beside the gRPC server.

`python -m gateway` (what `make run` starts) launches the glm-api server and Envoy, waits until
both serve, and stops both on SIGINT/SIGTERM. The Envoy config template is envoy/envoy.yaml.tmpl.
"""
