"""Image → result, no threads: the runtime, bundles, backends, pre- and post-processing."""
