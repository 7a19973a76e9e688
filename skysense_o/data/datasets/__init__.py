"""Dataset registrations in Detectron2's DatasetCatalog and MetadataCatalog."""
