// Koa under herd: PORT=3000 herd run -i 2 bench/compat/apps/koa.js
const Koa = require('koa');
const app = new Koa();
const me = { pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'koa' };
app.use(async (ctx) => { ctx.body = me; });
app.listen(Number(process.env.PORT || 3000));
