"""Getting a grown model out of Esper: ``load_run`` (the trained module, rebuilt and verified),
``unwrap`` (wrappers removed, exactly-linear fossilized seeds merged) and ``esper export`` (pt2,
safetensors or ONNX, checked against the trained model on held-out data)."""
