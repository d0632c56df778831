// Express 4 under herd: PORT=3000 herd run -i 2 bench/compat/apps/express.js
const express = require('express');
const app = express();
const me = { pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'express' };
app.get('/', (req, res) => res.json(me));
app.listen(Number(process.env.PORT || 3000), () => {});
