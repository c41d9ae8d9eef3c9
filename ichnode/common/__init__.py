"""What node, worker and training share and nothing else: configuration, the result contract,
the DICOM and priority vocabulary, slice geometry, the queue. It imports none of them."""
