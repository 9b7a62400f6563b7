"""The coordinator: watches the mesh, records runs and membership, serves the REST API and the status page."""
