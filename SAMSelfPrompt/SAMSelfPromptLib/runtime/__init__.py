"""One persistent worker thread, its events and cancel, and the one segmentation job every host runs."""
