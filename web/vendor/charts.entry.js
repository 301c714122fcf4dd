// The second entry esbuild bundles (`make web`, `npm run build`), into web/vendor/charts.js: Chart.js
// for the Monitor page, tree-shaken. Only what the page draws is registered (bar charts on category
// and linear axes, with a legend and tooltips), so the rest of Chart.js stays out of the bundle.
// The version comes from package-lock.json; no CDN.
import { BarController, BarElement, CategoryScale, Chart, Legend, LinearScale, Tooltip } from "chart.js";

Chart.register(BarController, BarElement, CategoryScale, LinearScale, Legend, Tooltip);

export { Chart };
