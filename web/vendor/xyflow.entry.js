// The one entry esbuild bundles (`make web`, `npm run build`) into web/vendor/xyflow.js: React,
// React DOM and React Flow as a single ES module the plain UI modules import, with no CDN and no
// build step for the UI's own code. Versions come from package-lock.json.
export { createElement, Fragment, memo, useState, useEffect, useRef, useCallback } from "react";
export { createRoot } from "react-dom/client";
export {
  ReactFlow, ReactFlowProvider, MiniMap, Controls, Background, BackgroundVariant, Handle, Position, Panel,
  NodeResizer, applyNodeChanges, applyEdgeChanges, useReactFlow, MarkerType,
} from "@xyflow/react";
